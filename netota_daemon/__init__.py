"""netota: firmware upgrades for JieLi AC79 WiFi devices over the single-backup network protocol."""

__version__ = "0.1.0"
