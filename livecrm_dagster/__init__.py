"""Link live-commerce viewers to shop orders, report broadcasts and plan follow-ups."""
