"""What crosses a process boundary: the tensor frame codec, the generated gRPC modules, cluster authentication."""
