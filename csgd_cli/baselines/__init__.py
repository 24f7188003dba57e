"""Floor 5: the field's pruning criteria at C-SGD's widths."""
