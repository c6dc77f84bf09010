"""What the operator writes: the policy file and list files, read and checked, and the
store of committed and candidate policies."""
