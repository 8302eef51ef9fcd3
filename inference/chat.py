"""Playground turns: what a chat, regenerate or edit writes before and after the model answers.

Plain functions named by verb (the websocket consumer calls them through database_sync_to_async);
each write happens in one transaction so a rejected turn stores nothing.
"""

from datetime import timedelta

from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from .models import Adapter, Conversation, Message
from .protocol import InvalidRequest, clean_options

# An answer still "streaming" after this long belongs to a web process that died mid-answer.
STALE_STREAM = timedelta(minutes=10)


def servable_experts():
    return set(Adapter.servable())


def check_turn(kind, content, options):
    """Validates a turn's text and options before anything is written; returns clean options."""
    if kind in ("chat", "edit"):
        if not isinstance(content, str) or not content.strip():
            raise InvalidRequest("the message is empty", "content")
        from django.conf import settings

        if len(content) > settings.R3MES_MAX_PROMPT_CHARS:
            raise InvalidRequest(f"the message has {len(content)} characters; the limit is "
                                 f"{settings.R3MES_MAX_PROMPT_CHARS}", "content", code="message_too_long")
    return clean_options(options or {}, known_experts=servable_experts())


def access_conversation(user, conversation_id):
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
        raise InvalidRequest("conversation must be a conversation id", "conversation")
    conversation = Conversation.for_user(user, conversation_id)
    if conversation is None:  # someone else's id reads exactly like a missing one
        raise InvalidRequest("conversation not found", "conversation", code="not_found")
    return conversation


@transaction.atomic
def start_turn(user, kind, conversation_id, content, options):
    """Writes the prompt (new, or edited) and an empty streaming answer; returns
    (conversation, answer, history for the model)."""
    if kind == "chat" and conversation_id is None:
        conversation = Conversation.objects.create(owner=user, title=" ".join(content.split())[:60] or "New chat")
    else:
        conversation = access_conversation(user, conversation_id)
        conversation = Conversation.objects.select_for_update().get(pk=conversation.pk)
    if conversation.messages.filter(status=Message.Status.STREAMING,
                                    created__gte=timezone.now() - STALE_STREAM).exists():
        raise InvalidRequest("an answer is still being generated in this conversation; stop it first",
                             "conversation", code="busy")
    if kind == "chat":
        prompt = Message.objects.create(conversation=conversation, role=Message.Role.USER, content=content)
    else:
        prompt = conversation.last_user_message()
        if prompt is None:
            raise InvalidRequest("this conversation has no message to answer again", "conversation")
        if kind == "edit":
            prompt.content = content
            prompt.save(update_fields=["content"])
        # Earlier answers stay as versions; only the new one is shown.
        prompt.answers.update(is_current=False)
    # Answers to earlier prompts keep is_current; everything after the prompt is this turn's.
    version = (prompt.answers.aggregate(v=Max("version"))["v"] or 0) + 1
    answer = Message.objects.create(conversation=conversation, role=Message.Role.ASSISTANT, reply_to=prompt,
                                    version=version, status=Message.Status.STREAMING, options=options)
    conversation.options = options
    conversation.updated = timezone.now()
    conversation.save(update_fields=["options", "updated"])
    return conversation, answer, conversation.history(upto=prompt)


def finish_answer(answer_id, status, text, *, experts=None, sources=None, metrics=None, error=""):
    answer = Message.objects.get(pk=answer_id)
    answer.finish(status, text, experts=experts, sources=sources, metrics=metrics, error=error)
    return answer
