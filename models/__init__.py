"""Face models behind one interface (docs/design.md section 4)."""
