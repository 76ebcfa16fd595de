"""Kubernetes context: names (pods, services, nodes, SPIFFE identities) for the addresses in an analysis, from
`kubectl get ... -o json` and `istioctl ztunnel-config ... -o json` snapshots (see `inventory`)."""
from hbonecap.k8s.enrich import enrich, split_endpoint
from hbonecap.k8s.inventory import Inventory, InventoryError, Owner, ServicePort, as_inventory, load_inventory
from hbonecap.k8s.placement import address_groups, place_captures

__all__ = ["Inventory", "InventoryError", "Owner", "ServicePort", "address_groups", "as_inventory", "enrich",
           "load_inventory", "place_captures", "split_endpoint"]
