"""The selector: hosts the large model (Ray Serve or a plain grpc.aio server), answers each checked position
with an index into the worker's candidates, and logs every selection."""
