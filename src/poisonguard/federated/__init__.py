"""Federated learning defences: robust aggregation and naming of malicious clients
(:class:`FederatedServer`), and a FedAvg simulation with backdoor attackers
(:mod:`poisonguard.federated.simulate`)."""

from poisonguard.federated.aggregators import Aggregate
from poisonguard.federated.server import DEFENSES, FederatedServer, RoundResult
from poisonguard.federated.updates import UpdateLayout, stack_updates

__all__ = ["DEFENSES", "Aggregate", "FederatedServer", "RoundResult", "UpdateLayout",
           "stack_updates"]
