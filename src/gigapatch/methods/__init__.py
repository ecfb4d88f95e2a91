"""gigapatch.methods"""
