"""Built-in request handlers: what runs per connection."""
