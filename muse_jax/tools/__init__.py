"""PyTorch interoperability tools (no PyTorch needed).

- `torch_format`: safe reading and writing of PyTorch `.pth` checkpoint files without importing torch.
- `convert`: official MUSE state dicts <-> muse_jax backbone variables.
- `import_torch` / `export_torch`: command-line entry points built on the two above.
"""
