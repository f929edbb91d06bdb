from sftscale.cli import run

run()
