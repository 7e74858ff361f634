"""``poisonguard federated``: the FedAvg simulation with attackers and a server-side defence.

Wire into the main parser with ``register(subparsers)``. Every option is checked before data is
loaded; bad input is a one-line error and exit 2.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from poisonguard.federated.server import DEFENSES
from poisonguard.federated.simulate import ATTACKS, DATASETS, MODELS, SimConfig


def _default_root() -> str:
    return os.environ.get("POISONGUARD_DATA", "../shared/datasets")


def register(sub: Any) -> None:
    """Add ``federated`` to an argparse subparsers object."""
    p = sub.add_parser(
        "federated", help="simulate FedAvg with malicious clients and a server-side defence",
        description="Clients hold IID shards of MNIST or CIFAR-10 and train the global model "
                    "locally each round; from --attack-start on, --malicious of them plant a "
                    "BadNets backdoor (data poisoning, or model replacement: the poisoned "
                    "update scaled by clients / server lr). The server aggregates with "
                    "--defense and names suspicious clients. Writes OUT/report.json (per round: "
                    "accuracy, ASR, who was named). Exit 0 on success, 2 on bad input.")
    p.add_argument("--dataset", default="mnist", choices=list(DATASETS))
    p.add_argument("--data-root", default=None,
                   help="folder holding mnist/mnist.npz or cifar10/cifar10_jpeg_decoded.npz "
                        "(or the standard idx / binary layouts); default $POISONGUARD_DATA or "
                        "../shared/datasets")
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--malicious", type=int, default=1)
    p.add_argument("--attack", default="data", choices=list(ATTACKS))
    p.add_argument("--defense", default="cluster", choices=list(DEFENSES))
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--attack-start", type=int, default=5,
                   help="first round the malicious clients attack (they attack every round "
                        "from then on)")
    p.add_argument("--samples-per-client", type=int, default=1000)
    p.add_argument("--test-size", type=int, default=5000, help="test samples evaluated")
    p.add_argument("--model", default="mlp", choices=list(MODELS),
                   help="built-in architecture (mlp: cheapest on CPU)")
    p.add_argument("--local-epochs", type=int, default=1)
    p.add_argument("--local-lr", type=float, default=0.05)
    p.add_argument("--server-lr", type=float, default=1.0)
    p.add_argument("--poison-fraction", type=float, default=0.5,
                   help="share of a malicious client's shard carrying the trigger")
    p.add_argument("--attack-epochs", type=int, default=2,
                   help="local epochs of a model-replacement attacker")
    p.add_argument("--target", type=int, default=None,
                   help="the backdoor's target class (default (3 x seed + 1) mod 10)")
    p.add_argument("--noise", type=float, default=0.0,
                   help="clip/cluster: Gaussian noise std added to the aggregate, as a multiple "
                        "of the clipping bound")
    p.add_argument("--trim-fraction", type=float, default=0.1,
                   help="trimmed: share dropped at each end (at least one client)")
    p.add_argument("--krum-f", type=int, default=None,
                   help="krum: assumed attackers (default (clients - 3) // 2)")
    p.add_argument("--z", type=float, default=None,
                   help="cluster: robust z-score above which a client is named (default: "
                        "calibrated for the client count at --alpha; 6.8 for 10 clients)")
    p.add_argument("--alpha", type=float, default=0.002,
                   help="cluster: false-alarm rate per honest client that sets the default --z "
                        "(0.002)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: the CPUs this process may use, or "
                        "OMP_NUM_THREADS when set)")
    p.add_argument("--out", required=True, help="output folder (report.json)")
    p.set_defaults(handler=cmd_federated)


def config_from_args(args: argparse.Namespace) -> SimConfig:
    return SimConfig(
        dataset=args.dataset, data_root=args.data_root or _default_root(), clients=args.clients,
        malicious=args.malicious, attack=args.attack, defense=args.defense, rounds=args.rounds,
        attack_start=args.attack_start, seed=args.seed,
        samples_per_client=args.samples_per_client, test_size=args.test_size, model=args.model,
        local_epochs=args.local_epochs, local_lr=args.local_lr, server_lr=args.server_lr,
        poison_fraction=args.poison_fraction, attack_epochs=args.attack_epochs,
        target=args.target, noise=args.noise, trim_fraction=args.trim_fraction,
        krum_f=args.krum_f, z=args.z, alpha=args.alpha)


def cmd_federated(args: argparse.Namespace) -> int:
    from poisonguard.federated.simulate import simulate, write_report
    from poisonguard.io import check_writable_dir

    check_writable_dir(args.out)
    cfg = config_from_args(args)
    cfg.check()

    def show(r: dict[str, Any]) -> None:
        mark = "attack" if r["attacking"] else "      "
        print(f"round {r['round']:>3} {mark} accuracy {r['accuracy']:.4f} ASR {r['asr']:.4f} "
              f"named {', '.join(r['named']) or '-'}", flush=True)

    report = simulate(cfg, progress=None if args.quiet else show)
    path = write_report(report, args.out)
    s = report["summary"]
    named = (f"; malicious named in {s['named_rounds']}/{s['attack_rounds']} attack rounds"
             if report["malicious"] and s["names_clients"] else "")
    print(f"{cfg.defense} vs {cfg.attack}: final accuracy {s['final_accuracy']:.4f}, ASR "
          f"{s['final_asr']:.4f}{named}; wrote {path}")
    return 0
