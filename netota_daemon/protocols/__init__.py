"""One Twisted protocol per device port (CTP 3333, HTTP 8080, OTA 3335) and the endpoints to reach them."""
