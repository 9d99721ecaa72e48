"""Load testing (locust scenario, `ctr loadtest` runner and report) and the `ctr bench` suite."""
