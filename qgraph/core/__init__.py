"""The core: the pass contract and manager, dump instruments, errors, graph helpers, the one
operator vocabulary and the meta keys and records passes leave on nodes. Imports torch only."""
