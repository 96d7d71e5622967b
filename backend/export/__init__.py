"""Interchange: one result, any tool (DESIGN.md section 8).

``axes`` holds the one axis and unit conversion that every writer and the Blender add-on share.
The format writers (USD, glTF, Live Link Face CSV) live beside it.
"""
