"""What runs report: classification metrics and JSON reports (`metrics`), and plots (`plots`)."""
