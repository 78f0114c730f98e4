"""Follow-up sending: scenarios, send-time rules, the send ledger and the channels."""
