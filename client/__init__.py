"""The headless client, `glm4voice call URL` (docs/client.md): an aiortc caller of the server's
Realtime-style protocol for prototypes without a browser. Torch-free, like server/.

    from client.call import Call, CallOptions
"""
