# Copyright: dstack.tee contributors
# GNU General Public License v3.0+ (see COPYING or https://www.gnu.org/licenses/gpl-3.0.txt)
"""Serving a Flask app with gunicorn, the one way every agent does it (KMS, VMM, guest agent)."""


def run_gunicorn(app, **settings):
    """Serve `app` with these gunicorn settings until SIGTERM/SIGINT (returns via SystemExit).

    Settings this gunicorn does not know are skipped (so a newer setting can be passed safely);
    gunicorn's control socket (on by default in gunicorn 25+, under $HOME) is always off: two
    agents of one user would otherwise fight over it, and none needs it.
    """
    from gunicorn.app.base import BaseApplication  # pylint: disable=import-outside-toplevel

    settings = dict(settings, control_socket_disable=True)

    class Server(BaseApplication):  # pylint: disable=abstract-method
        def load_config(self):
            for name, value in settings.items():
                if name in self.cfg.settings:
                    self.cfg.set(name, value)

        def load(self):
            return app

    Server().run()


def request_params(list_fields=()):
    """A pRPC request's parameters: GET query parameters and the JSON object body, merged (the body wins).

    The body is read as JSON whatever its Content-Type (dstack's clients do not all set one);
    anything but a JSON object is refused with a DstackError naming the request.
    """
    import json  # pylint: disable=import-outside-toplevel
    from flask import request  # pylint: disable=import-outside-toplevel
    from ansible_collections.dstack.tee.plugins.module_utils.errors import DstackError  # pylint: disable=import-outside-toplevel

    params = request.args.to_dict()
    for name in list_fields:
        if name in request.args:
            params[name] = request.args.getlist(name)
    if request.method == "POST":
        raw = request.get_data(cache=False)
        if raw.strip():
            try:
                body = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise DstackError("request", "the body is not valid JSON (only JSON is served, not protobuf)") from None
            if not isinstance(body, dict):
                raise DstackError("request", "the body must be a JSON object")
            params.update(body)
    return params
