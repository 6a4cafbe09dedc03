"""``python gateway.py``: serve every function a module in ``modules/`` lists in
``__all_exposed__`` as ``POST /rest/<name>/<var1>``. The gateway itself is gateway_app.py.

Why two files: CPython keeps the syntax tree of the script it runs in memory until that
script ends, which for a server is its whole life. For gateway_app.py (1,700 lines then; 2,500
now) that tree held about 4 MB of a 49 MB idle process, and compiling them on every start cost about
20 ms. A module the script imports comes from cached bytecode, and its tree is freed once it
is compiled. So this file stays a few lines long, and everything else lives in gateway_app.py.

For embedding (README): ``gateway.create_app``, ``gateway.serve``, ``gateway.load_modules``
and ``gateway.Settings``.
"""

import sys

from gateway_app import Settings, create_app, load_modules, main, serve

__all__ = ["Settings", "create_app", "load_modules", "main", "serve"]

if __name__ == "__main__":
    sys.exit(main())
