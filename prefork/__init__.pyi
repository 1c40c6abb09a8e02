# What prefork/__init__.py exports, for type checkers: it imports the API's names on first use.
from prefork.api import OptionError as OptionError
from prefork.api import PreforkServer as PreforkServer
from prefork.api import ServerError as ServerError
from prefork.api import ServerOptions as ServerOptions
from prefork.api import serve as serve

__version__: str
__all__ = ["OptionError", "PreforkServer", "ServerError", "ServerOptions", "__version__", "serve"]
