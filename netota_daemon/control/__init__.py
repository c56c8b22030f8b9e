"""The daemon's HTTP+JSON control API (``/v1/...``) on the control endpoint.

One module owns one thing: :mod:`.channel` the connections (HTTP parsing bounds, idle and request
timeouts, the connection limit), :mod:`.routing` the request plumbing (access, routes, answers and
errors), :mod:`.json_body` the bounded JSON decoder every body goes through, :mod:`.errors` the
mapping of refusals to HTTP statuses, and one module per group of endpoints (:mod:`.status`,
:mod:`.jobs`, :mod:`.devices`, :mod:`.events`). :mod:`.api` puts them together; a new endpoint group
is a module with a ``routes()`` method, added there.
"""
