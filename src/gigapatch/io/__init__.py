"""gigapatch.io"""
