"""One upgrade of one device: phases, retries inside a deadline, the reboot wait, outcomes, progress."""
