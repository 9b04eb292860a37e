"""The SLM worker: drafts with the small model, asks a verifier (the remote selector or the local
re-ranker) about blocks of drafts, and streams committed text to gRPC clients."""
