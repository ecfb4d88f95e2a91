"""gigapatch.models"""
