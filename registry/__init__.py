"""etcd registry: key layout, instance records, lease-based registration, watch discovery."""
