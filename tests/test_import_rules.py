"""The house rule that keeps a proxy-only install light: no torch or diffusers without a local route."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}

PROBE = textwrap.dedent("""
    import asyncio, json, sys
    from proxy import build_app, load_config
    from proxy.cli import build_parser

    async def main():
        config = load_config(sys.argv[1], env={})
        # Keep only the models without a local route, as a proxy-only deployment would.
        local = {name for name, p in config.providers.items() if p.kind in ("diffusers", "ray")}
        assert {"local-tiny", "local-gpu", "local-tiny-edit"} <= local
        for name, model in list(config.models.items()):
            if any(r.provider in local for r in model.routes):
                config.models.pop(name)
        for name in local:
            config.providers.pop(name)
        app = build_app(config)
        gateway = next(iter(app.values()))
        await gateway.start()
        await gateway.close()

    asyncio.run(main())
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "diffusers", "transformers"))))
""")


def test_proxy_without_local_route_imports_no_torch(tmp_path):
    out = subprocess.run([sys.executable, "-c", PROBE, str(ROOT / "models.yaml")], cwd=tmp_path,
                         env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_local_backend_import_is_light():
    code = "import sys, local_backend; print(any(m.startswith(('torch', 'diffusers')) for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
