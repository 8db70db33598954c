"""Applications built on meshlib's public API only: the ``meshlib`` command (:mod:`meshlib.tools.cli`) and the
demo it runs (:mod:`meshlib.tools.demo`).

They use what any application may use -- ``meshlib.Client``, ``meshlib.MeshConfig``, ``client.mesh_status()``
(:mod:`meshlib.status`), ``client.http_library``, the public :mod:`meshlib.discovery` and :mod:`meshlib.testing`
helpers, the admin endpoint's ``/status`` JSON -- and nothing private: no ``client.mesh``, no ``meshlib._*``
module, no resilience internals. What they show is therefore what an application can see, and a change to the
mesh's internals cannot break them. ``tests/test_tools_public_api.py`` checks their imports.
"""
