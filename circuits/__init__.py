"""Circuit definitions: adjudication and range graphs, and the Solidity verifier tooling."""
