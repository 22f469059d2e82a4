"""What the cache holds in operators' terms and what they do with it: listing and
inspecting images, export and import of OCI layout archives, pruning and warming."""
