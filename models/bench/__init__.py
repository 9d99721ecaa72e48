"""`ctr bench models` (`quality`: models beside the oracle) and `ctr bench multitask`."""
