# The forward pass wrapper (owned by the engine work).
