"""qpack's builder: the `qpack` command line and the packer that writes executables."""
