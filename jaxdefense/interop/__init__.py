"""PyTorch interchange: state_dicts in and out (convert), their key torch_layouts."""
