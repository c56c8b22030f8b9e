from twisted.application.service import ServiceMaker

netota = ServiceMaker("netota", "netota_daemon.tap", "Firmware upgrades for JieLi AC79 WiFi devices.", "netota")
