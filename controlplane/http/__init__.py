"""The HTTP API (litestar): a thin shell over :class:`controlplane.core.ControlPlane`.

`app` builds the application (:func:`controlplane.http.app.create_app`); `controllers/` holds
one controller per resource, each declaring its security, scope and guards once; `guards`
authenticates; `problems` turns errors into ``application/problem+json``; `params` holds the
shared parameter types and the strict body check; `openapi` the document's adjustments;
`middleware` the request id, access log and body decoding.
"""
