"""`chainyard deploy k8s`: write the Kubernetes manifests of a config (docs/KUBERNETES.md)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from chainyard.contracts import ConfigError, load_config

from .render import (
    HEADER_START,
    RenderError,
    Settings,
    render,
    to_files,
    to_stream,
)

DEFAULTS = Settings()


def configure(
    sp: argparse.ArgumentParser, add_nats: Callable[[argparse.ArgumentParser], None]
) -> None:
    """The `deploy` targets under `sp` (today: `k8s`). `add_nats` is unused: rendering does not
    connect; the pods read their NATS URL from a Secret."""
    del add_nats
    targets = sp.add_subparsers(dest="deploy_target", required=True)
    help = "render Kubernetes manifests (Deployments, KEDA ScaledObjects, ...) from a config"
    p = targets.add_parser("k8s", help=help, description=help)
    p.add_argument("--config", required=True, help="the TOML config the services will read")
    p.add_argument("--namespace", default=DEFAULTS.namespace, help="default: %(default)s")
    p.add_argument("--image", default="", help="image of the services (default: chainyard:VERSION)")
    p.add_argument(
        "--out", help="write one file per object and kustomization.yaml here (default: stdout)"
    )
    p.add_argument(
        "--tools", help="module:attribute of the Tools registry in the image (the config's tools)"
    )
    p.add_argument(
        "--nats-secret",
        default=DEFAULTS.nats_secret,
        help="Secret whose key `url` is the services' NATS URL and `gateway-url` the gateway's "
        "(its own NATS user) (default: %(default)s)",
    )
    p.add_argument(
        "--keys-secret",
        default=DEFAULTS.keys_secret,
        help="Secret holding each pool's api_key_env as a key (default: %(default)s)",
    )
    p.add_argument(
        "--nats-monitoring",
        default=DEFAULTS.nats_monitoring,
        help="NATS monitoring host:port KEDA reads (default: %(default)s)",
    )
    p.add_argument(
        "--nats-account",
        default=DEFAULTS.nats_account,
        help="the services' NATS account (default: %(default)s, as in deploy/accounts.conf)",
    )


async def run(args: argparse.Namespace) -> int:
    """Exit 0 rendered, 2 the config or an option cannot make a deployment (one line why)."""
    try:
        return render_to(args)
    except (RenderError, ConfigError, OSError) as e:
        message = f"{e.filename}: {e.strerror or e}" if isinstance(e, OSError) else str(e)
        print(f"chainyard deploy k8s: {message}", file=sys.stderr)
        return 2


def render_to(args: argparse.Namespace) -> int:
    text = Path(args.config).read_text()
    config = load_config(args.config)
    settings = Settings(
        namespace=args.namespace,
        image=args.image,
        tools=args.tools,
        nats_secret=args.nats_secret,
        keys_secret=args.keys_secret,
        nats_monitoring=args.nats_monitoring,
        nats_account=args.nats_account,
    )
    objs = render(config, text, settings)
    source = Path(args.config).name
    if not args.out:
        sys.stdout.write(to_stream(objs, source))
        return 0
    count = write_files(Path(args.out), to_files(objs, source))
    print(f"{count} files in {args.out} (kubectl apply -k {args.out})")
    return 0


def write_files(out: Path, files: dict[str, str]) -> int:
    """Write `files` into `out`; files an earlier render wrote for objects this config no longer
    has (a pool removed) are deleted, anything else there is left alone."""
    out.mkdir(parents=True, exist_ok=True)
    stale = {p.name for p in out.glob("*.yaml")} - set(files)
    for name, body in files.items():
        (out / name).write_text(body)
    for name in sorted(stale):
        if (out / name).read_text().startswith(HEADER_START):
            (out / name).unlink()
    return len(files)
