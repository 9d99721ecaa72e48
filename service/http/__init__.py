"""The HTTP layer: the app factory, routes, request/response schemas, API keys, the error
envelope and the request middleware. It talks to the engine through `service.contracts`."""
