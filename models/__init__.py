"""Face models behind one interface (DESIGN.md section 4)."""
