"""A minimal settings module: one app, one PostgreSQL database.

Host, port and user come from libpq's PGHOST, PGPORT and PGUSER.
"""
import os

SECRET_KEY = "example-only"
INSTALLED_APPS = ["payments"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("PGDATABASE", "postgres"),
    }
}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
USE_TZ = True
