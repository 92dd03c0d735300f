# Flask-WTF 1.2: the part the broker uses (see stubs/README.md).
from flask_wtf.csrf import CSRFProtect as CSRFProtect
from flask_wtf.form import FlaskForm as FlaskForm
