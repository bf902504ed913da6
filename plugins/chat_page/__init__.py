"""A small chat page at ``/``: static HTML/JS (no build step) that streams from the API."""

from plugins.chat_page.plugin import ChatPageConfig, ChatPageFactory, ChatPagePlugin

factory = ChatPageFactory()

__all__ = ["ChatPageConfig", "ChatPageFactory", "ChatPagePlugin", "factory"]
