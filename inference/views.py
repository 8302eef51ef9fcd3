"""Playground pages: the chat page (the chat itself runs over /ws/chat/), conversation rename and
delete, and feedback on answers."""

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, JsonResponse
from django.shortcuts import redirect, render
from django.views.decorators.http import require_POST

from .chat import STALE_STREAM
from .markdown import pygments_css, render_markdown
from .models import Conversation, Feedback, Message


def _conversation_or_404(user, pk):
    conversation = Conversation.for_user(user, pk)
    if conversation is None:
        raise Http404("No such conversation")
    return conversation


@login_required
def playground(request, pk=None):
    conversations = request.user.conversations.all()
    query = request.GET.get("q", "").strip()
    if query:
        conversations = conversations.filter(title__icontains=query) | conversations.filter(
            messages__content__icontains=query)
        conversations = conversations.distinct()
    conversation = _conversation_or_404(request.user, pk) if pk is not None else None
    thread = []
    if conversation is not None:
        conversation.expire_stale_answers(STALE_STREAM)
        feedback = {f.message_id: f for f in Feedback.objects.filter(user=request.user, message__conversation=conversation)}
        for message in conversation.visible_messages():
            versions = message.versions() if message.role == Message.Role.ASSISTANT else []
            thread.append({
                "message": message,
                "html": render_markdown(message.content) if message.role == Message.Role.ASSISTANT else None,
                "earlier": [(v, render_markdown(v.content)) for v in versions if v.pk != message.pk],
                "feedback": feedback.get(message.pk),
                "meta": {"experts": message.experts, "sources": message.sources, "metrics": message.metrics},
            })
    return render(request, "inference/playground.html", {
        "conversations": conversations[:200], "conversation": conversation, "thread": thread, "query": query,
        "options": conversation.options if conversation else new_chat_options(request.user),
        "pygments_css": pygments_css(),
    })


def new_chat_options(user):
    """A new chat answers from the user's documents when they have uploaded some (their own ready
    documents: an explicit intent, unlike someone else's public collection)."""
    from rag.models import Document

    return {"rag": Document.objects.live().filter(collection__owner=user).exists()}


@login_required
@require_POST
def rename_conversation(request, pk):
    conversation = _conversation_or_404(request.user, pk)
    conversation.rename(request.POST.get("title", ""))
    return redirect("playground-conversation", pk=conversation.pk)


@login_required
@require_POST
def delete_conversation(request, pk):
    conversation = _conversation_or_404(request.user, pk)
    conversation.delete()
    messages.success(request, f"Deleted “{conversation.title}”.")
    return redirect("playground")


@login_required
@require_POST
def feedback(request, pk):
    """Thumbs up/down on an answer, optionally with the corrected answer (JSON for the page's JS)."""
    message = Message.objects.filter(pk=pk, role=Message.Role.ASSISTANT, conversation__owner=request.user).first()
    if message is None:
        return JsonResponse({"error": "No such answer"}, status=404)
    rating = request.POST.get("rating")
    if rating not in ("1", "-1"):
        return JsonResponse({"error": "rating must be 1 (thumbs up) or -1 (thumbs down)"}, status=400)
    correction = request.POST.get("correction", "").strip()
    if len(correction) > 20000:
        return JsonResponse({"error": "the correction is too long (20000 characters at most)"}, status=400)
    record = Feedback.record(request.user, message, int(rating), correction)
    return JsonResponse({"ok": True, "rating": record.rating, "correction": record.correction})
