"""The WSGI entry gunicorn loads in each worker (after the fork, so the engine client is per worker)."""

from model_handler import envs
from model_handler.logging_setup import configure_logging
from serve.app import create_app
from serve.settings import Settings

configure_logging(envs.process_environ(), process="http")
app = create_app(Settings.from_env(envs.process_environ()))
