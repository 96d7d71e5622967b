"""detail"""
