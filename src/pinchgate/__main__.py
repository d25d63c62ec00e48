from pinchgate.cli import app

app(prog_name="pinchgate")
