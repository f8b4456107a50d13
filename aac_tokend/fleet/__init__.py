"""Fleet mode: one chain's state in etcd, owned by one elected host, served on every host."""
