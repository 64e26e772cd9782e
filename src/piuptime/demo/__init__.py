"""``piuptime demo``: demo devices on loopback with the gateway in front of them."""
