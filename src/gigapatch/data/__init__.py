"""gigapatch.data"""
