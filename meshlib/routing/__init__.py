"""Routes: which service a call goes to, with which filters and policy (Gateway API HTTPRoute semantics).

:mod:`meshlib.routing.model` is the compiled, immutable route table the request path reads;
:mod:`meshlib.routing.gateway_api` builds it from HTTPRoute documents (``MESHLIB_ROUTES_FILE``);
:mod:`meshlib.routing.filters` holds what the filters compute (header changes, rewritten paths, redirects).
docs/routing.md explains the model.
"""
