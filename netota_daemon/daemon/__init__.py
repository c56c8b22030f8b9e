"""The ``twistd netota`` service: config, device registry, job queue, journal, systemd notify."""
